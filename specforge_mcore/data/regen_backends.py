"""What ``specforge-mcore regenerate`` asks of a backend, and the OpenAI-compatible endpoint backend.

A backend answers chat contexts: ``generate(contexts)`` takes message lists that end with a user (or
system) turn and returns one ``Reply`` per context, in order. Besides ``generate`` it names itself
(``name``, ``model_name``) and says how the driver should feed it: ``batch_size`` contexts per call and
``workers`` calls at once. The local backend (``regen_local``) takes large batches on one worker; the
endpoint backend takes one context per call and many workers, since the server batches for itself.

A reply is an answer (``text``, ``finish_reason``, ``tokens``), a refusal (``refused``: the backend will
not answer this context, e.g. HTTP 400 for a prompt over the server's context length; asking again gives
the same), or a failure (``failed``: the last error after every retry; a later run may succeed).

The endpoint backend uses only the standard library (``urllib.request``): each request is retried on a
connection error, a timeout, HTTP 5xx, HTTP 429 and a 200 whose body is not JSON, with exponential
back-off and jitter; any other HTTP 4xx is a refusal and is not retried.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from specforge_mcore.errors import UserError

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


@dataclass(frozen=True)
class Settings:
    """How answers are sampled; the same for both backends, and recorded in every output record."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    thinking: Optional[bool] = None  # enable_thinking for the chat template; None: the template's default
    max_turns: Optional[int] = None  # answer only the first N assistant turns; the conversation ends there

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: expected a positive number of tokens")
        if not self.temperature >= 0:
            raise UserError(f"--temperature {self.temperature}: expected 0 (greedy) or a positive temperature")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: expected a probability in (0, 1]")
        if self.max_turns is not None and self.max_turns < 1:
            raise UserError(f"--max-turns {self.max_turns}: expected at least 1 assistant turn")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def template_kwargs(self) -> dict:
        return {} if self.thinking is None else {"enable_thinking": self.thinking}

    def context_seed(self, messages: list[dict]) -> int:
        """A seed for one context: ``seed`` mixed with the context's text, so that a rerun (a resumed run,
        other batches, other workers) samples each context the same way where the backend allows it."""
        blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
        return (self.seed * 1_000_003 + zlib.crc32(blob)) % (1 << 31)


@dataclass
class Reply:
    text: str = ""
    finish_reason: str = ""  # "stop", "length", or what the server said
    tokens: int = 0  # generated tokens (the end-of-turn token included), when known
    refused: str = ""  # why the backend will not answer this context
    failed: str = ""  # the last error after every retry


class Backend(Protocol):
    name: str
    model_name: str
    settings: Settings
    batch_size: int
    workers: int

    def generate(self, contexts: list[list[dict]]) -> list[Reply]: ...


class _Refused(Exception):
    """HTTP 4xx other than 429: the server will not answer this request."""


class _Failed(Exception):
    """Every attempt failed with a retryable error; the message is the last one."""


def _endpoint_base(url: str) -> str:
    """``http://host:port`` (or with a path prefix) without a trailing ``/v1``: both spellings are common."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise UserError(f"--endpoint {url!r}: expected an http:// or https:// URL of an OpenAI-compatible server")
    return base[:-3] if base.endswith("/v1") else base


def _error_detail(code: int, raw: bytes) -> str:
    """``HTTP 400: message`` from an OpenAI-style error body (``{"error": {"message"}}`` or ``{"message"}``)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(inner.get("message"), str):
            text = inner["message"]
    text = " ".join(text.split())
    return f"HTTP {code}" + (f": {text[:300]}" if text else "")


class EndpointBackend:
    """Answers through ``POST {url}/v1/chat/completions``, one context per request."""

    name = "endpoint"
    batch_size = 1

    def __init__(self, url: str, settings: Settings, model: Optional[str] = None, concurrency: int = 8,
                 max_retries: int = 5, timeout: float = 600.0, backoff: float = 1.0, max_backoff: float = 60.0,
                 api_key: Optional[str] = None):
        settings.check()
        if concurrency < 1:
            raise UserError(f"--concurrency {concurrency}: expected at least 1 request at a time")
        if max_retries < 0:
            raise UserError(f"--max-retries {max_retries}: expected 0 or more")
        if not timeout > 0:
            raise UserError(f"--timeout {timeout}: expected a positive number of seconds")
        self.url = url
        self.base = _endpoint_base(url)
        self.settings = settings
        self.workers = concurrency
        self.max_retries, self.timeout = max_retries, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self.api_key = api_key
        self._warned_reasoning = False
        self.model_name = self._check_model(model)

    # ---- one request, retried -------------------------------------------------------------------
    def _attempt(self, path: str, body: Optional[dict]) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base + path, data=data, headers=headers,
                                         method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read()
        return json.loads(raw)

    def _request(self, path: str, body: Optional[dict] = None) -> Any:
        """The decoded JSON answer; ``_Refused`` for a 4xx other than 429, ``_Failed`` after the retries."""
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)
            try:
                return self._attempt(path, body)
            except urllib.error.HTTPError as exc:
                try:
                    raw = exc.read()
                except (OSError, http.client.HTTPException):
                    raw = b""  # the error body was cut off; the status is what counts
                detail = _error_detail(exc.code, raw)
                if 400 <= exc.code < 500 and exc.code != 429:
                    raise _Refused(detail) from None
                retry_after = exc.headers.get("Retry-After", "") if exc.headers else ""
                if retry_after.strip().isdigit():
                    wait = min(self.max_backoff, max(wait, float(retry_after)))
            except (OSError, http.client.HTTPException) as exc:
                # URLError (refused, reset, DNS), RemoteDisconnected (closed without an answer), timeouts,
                # IncompleteRead (closed mid-answer): all transient as far as one request can tell.
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                detail = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            except ValueError as exc:  # a 200 whose body is not JSON (a proxy's page, a cut stream)
                detail = f"the answer is not JSON ({exc})"
            if attempt == self.max_retries:
                raise _Failed(f"{detail} (after {self.max_retries + 1} attempts)")
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _check_model(self, model: Optional[str]) -> str:
        """The served model: ``model`` if the server lists it (or lists nothing), else the only one it lists.
        Also the reachability check: a wrong URL is one error line, not a failure per conversation."""
        where = self.base + MODELS_PATH
        try:
            listing = self._request(MODELS_PATH)
        except _Failed as exc:
            raise UserError(f"--endpoint {self.url}: cannot reach {where}: {exc}; expected an OpenAI-compatible "
                            f"server (SGLang, vLLM) there") from None
        except _Refused as exc:
            if model:
                return model  # the server lists no models; trust the name
            raise UserError(f"--endpoint {self.url}: {where} answered {exc}; name the served model with --model") from None
        served = [m.get("id") for m in (listing.get("data") or []) if isinstance(m, dict)] \
            if isinstance(listing, dict) else []
        served = [s for s in served if isinstance(s, str)]
        if model:
            if served and model not in served:
                raise UserError(f"--model {model!r} is not served at {self.url}; it serves {', '.join(served)}")
            return model
        if len(served) != 1:
            raise UserError(f"--endpoint {self.url} serves {len(served)} models ({', '.join(served) or 'none listed'}); "
                            f"name one with --model")
        return served[0]

    # ---- the interface ------------------------------------------------------------------------------
    def request_body(self, messages: list[dict]) -> dict:
        s = self.settings
        body: dict[str, Any] = {"model": self.model_name, "messages": messages, "max_tokens": s.max_new_tokens,
                                "temperature": s.temperature, "top_p": s.top_p, "stream": False}
        if s.sampling:
            body["seed"] = s.context_seed(messages)
        if s.thinking is not None:
            body["chat_template_kwargs"] = s.template_kwargs()
        return body

    def generate(self, contexts: list[list[dict]]) -> list[Reply]:
        return [self._answer(messages) for messages in contexts]

    def _answer(self, messages: list[dict]) -> Reply:
        try:
            answer = self._request(CHAT_PATH, self.request_body(messages))
        except _Refused as exc:
            return Reply(refused=str(exc))
        except _Failed as exc:
            return Reply(failed=str(exc))
        try:
            choice = answer["choices"][0]
            content = choice["message"].get("content")
            reasoning = choice["message"].get("reasoning_content")
            finish = choice.get("finish_reason")
            usage = answer.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError):
            return Reply(failed=f"the answer is not a chat completion: {json.dumps(answer)[:300]}")
        if content is not None and not isinstance(content, str):
            return Reply(failed=f"the answer's content is not text: {json.dumps(content)[:300]}")
        if reasoning and not self._warned_reasoning:
            self._warned_reasoning = True
            log.warning("%s returns the reasoning apart from the answer (reasoning_content): it is not part of "
                        "the regenerated turns; serve without a reasoning parser to keep it", self.url)
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return Reply(text=content or "", finish_reason=str(finish or ""),
                     tokens=tokens if isinstance(tokens, int) else 0)
