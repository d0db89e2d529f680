"""Exports and imported checkpoints are published like any model directory: files 0644, directories 0755,
even under a private umask (077) and although mkdtemp creates the directory 0700."""

import os
import stat

import pytest

from specforge_mcore.export.importer import import_draft
from specforge_mcore.export.io import write_export


def modes(directory):
    found = {".": stat.S_IMODE(os.stat(directory).st_mode)}
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


@pytest.fixture
def private_umask():
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("layout", ["sglang", "speculators"])
def test_export_and_import_files_are_0644(layout, llama_target, tmp_path, random_draft, arch_for, private_umask):
    target_dir, hf = llama_target
    export = write_export(random_draft(arch_for(hf)), str(tmp_path / "export"), layout=layout)
    found = modes(export)
    assert {"config.json", "model.safetensors", "README.md"} <= set(found)
    assert found == {name: 0o755 if name == "." else 0o644 for name in found}

    # --overwrite publishes the new directory with the same modes
    write_export(random_draft(arch_for(hf), seed=1), export, layout=layout, overwrite=True)
    assert modes(export) == found

    ckpt = import_draft(export, str(tmp_path / "ckpt"), target=target_dir).out_dir
    found = modes(ckpt)
    assert {"draft.safetensors", "config.yaml", "COMPLETE", "MANIFEST.json"} <= set(found)
    assert found == {name: 0o755 if name == "." else 0o644 for name in found}
