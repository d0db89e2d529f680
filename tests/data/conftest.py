import pytest

from specforge_mcore.target.prepare import DEFAULT_SMOLLM2_DIR, require_prepared


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    # A missing target is an error, not a skip: `make setup` prepares it before the tests.
    return require_prepared(DEFAULT_SMOLLM2_DIR)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
