"""What counts as a secret, and masking it: one rule for everything this project writes or sends
(MLflow params, tags and artifacts; the environment the deepspeed launcher exports to remote ranks).
"""

from __future__ import annotations

import os
import re
from typing import Any

# TOKEN but not tokens / tokenizer / token_id: packing.max_tokens is no secret
SECRET_NAME = re.compile(r"TOKEN(?!S|IZ|_ID)|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
SECRET_TEXT = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|\bsk-[A-Za-z0-9_-]{20,}"  # OpenAI-style API keys
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|(?i:\bbearer\s+)[A-Za-z0-9._~+/-]{8,}=*"  # Authorization headers
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"  # user:password@ in URLs
)
# `api_token=...`, `password: ...`, `?key=...`: the value after a secret-looking name
SECRET_ASSIGN = re.compile(rf"(\b[\w.-]*?(?:{SECRET_NAME.pattern})[\w.-]*\s*[=:]\s*)(?:\"[^\"]*\"|'[^']*'|[^\s\"',;&]+)",
                           re.IGNORECASE)
REDACTED = "***REDACTED***"


def is_secret_name(name: str) -> bool:
    """True for names that look like credentials (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_...),
    not for look-alikes (max_tokens, TOKENIZERS_PARALLELISM)."""
    return bool(SECRET_NAME.search(name))


def secret_env_values() -> list[str]:
    """Values of secret-named environment variables (longest first); paths are not secrets."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8 and v[0] not in "/~."}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, env_secrets: list[str] | None = None) -> str:
    """`text` with token-looking substrings and secret environment values masked."""
    for secret in secret_env_values() if env_secrets is None else env_secrets:
        text = text.replace(secret, REDACTED)
    return SECRET_ASSIGN.sub(lambda m: m.group(1) + REDACTED, SECRET_TEXT.sub(REDACTED, text))


def redact(value: Any, name: str = "", env_secrets: list[str] | None = None) -> Any:
    """`value` (nested dicts/lists too) with secrets masked: everything under a secret-looking name
    (`name` or a dict key) and secret-looking text anywhere."""
    env_secrets = secret_env_values() if env_secrets is None else env_secrets
    if name and is_secret_name(name) and value is not None and value != "":
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k), env_secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, "", env_secrets) for v in value]
    if isinstance(value, str):
        return redact_text(value, env_secrets)
    return value
