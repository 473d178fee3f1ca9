"""What the fetch and upload steps share about S3: the client, its retries, error wording.

Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN`` from the referenced Secret, or a web identity / instance role);
``AWS_ENDPOINT_URL`` points at an S3-compatible service. Error texts are built from S3's
error codes, never from request details, and are scrubbed of credential values.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, TypeAlias

from finetune_operator.domain.uris import StorageUri, UriError

# A boto3 S3 client. boto3 has no types (and is installed apart, decision 1301), so the
# client is untyped wherever the trainer passes it around.
S3Client: TypeAlias = Any

# The secret-bearing variables a Secret may inject; their values never reach a message.
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# botocore's "standard" retry mode backs off exponentially (capped at 20 s) on throttling,
# 5xx answers and connection errors; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE override these.
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_RETRY_MODE = "standard"
# Error codes that mean "the request was understood and refused": retrying cannot help.
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
    }
)
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName"})


class S3Problem(Exception):
    """An S3 failure, worded for the user; ``permanent`` when a retry cannot fix it."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # without leading or trailing "/"; "" for the bucket's root

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, relative: str) -> str:
        """The key of ``relative`` (a posix path) below this location."""
        return f"{self.key}/{relative}" if self.key else relative


def parse_s3_uri(uri: str) -> S3Location:
    try:
        parsed = StorageUri.parse(uri)
    except UriError:
        parsed = None
    if parsed is None or parsed.scheme != "s3":
        raise ValueError(f"{uri}: not an s3://bucket/prefix URI")
    return S3Location(bucket=parsed.bucket, key=parsed.path)


def quiet_sdk_logs() -> None:
    """boto's debug logs print request headers (access key id, session token): keep them off."""
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def scrub(text: str, env: dict[str, str] | None = None) -> str:
    """``text`` with every credential value of the environment replaced by ``***``."""
    values = [(env or os.environ).get(name, "") for name in CREDENTIAL_VARIABLES]
    for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def make_client() -> S3Client:
    """An S3 client on ``AWS_ENDPOINT_URL`` (if set) with bounded retries and timeouts.

    Raises ``S3Problem`` when boto3 is missing or no credentials can be found.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise S3Problem(
            "boto3 is not installed in this image: use the project's trainer image "
            "(it installs trainer-image/requirements-s3.txt) or set spec.image to one that has it",
            permanent=True,
        ) from exc
    quiet_sdk_logs()
    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_MAX_ATTEMPTS") and not os.environ.get("AWS_RETRY_MODE"):
        retries = {"retries": {"mode": DEFAULT_RETRY_MODE, "max_attempts": DEFAULT_MAX_ATTEMPTS}}
    session = boto3.session.Session()
    if session.get_credentials() is None:
        raise S3Problem(
            "no S3 credentials found: reference a Secret with keys AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (credentialsSecretRef), or give the pod a cloud identity",
            permanent=True,
        )
    return session.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        config=Config(connect_timeout=10, read_timeout=60, **retries),
    )


def error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    return str(code) if code else None


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else None


def _service_error(exc: BaseException) -> BaseException:
    """The S3 error behind a wrapper: boto3's upload_file re-raises a ClientError as
    S3UploadFailedError, which carries no error code of its own."""
    inner = exc.__cause__ or exc.__context__
    if error_code(exc) is None and inner is not None and error_code(inner) is not None:
        return inner
    return exc


def describe(exc: BaseException, what: str, location: S3Location, secret: str | None) -> S3Problem:
    """Turn a boto3/botocore exception into a user-facing ``S3Problem``.

    ``what`` names the action ("upload to", "download from"); ``secret`` is the name of the
    referenced Secret, used in advice (a name, never a value).
    """
    if isinstance(exc, S3Problem):
        return exc
    exc = _service_error(exc)
    holder = f"Secret {secret}" if secret else "the credentials in use"
    code = error_code(exc)
    status = _http_status(exc)
    kind = type(exc).__name__
    if code in MISSING_BUCKET_CODES or (code is None and status == 404 and kind == "ClientError"):
        return S3Problem(
            f"{what} {location.uri} failed: bucket {location.bucket} does not exist ({code}); "
            "create it or fix the s3:// URI",
            permanent=True,
        )
    if code in CREDENTIAL_CODES:
        return S3Problem(
            f"{what} {location.uri} failed: the S3 service rejected the credentials ({code}); "
            f"check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in {holder}",
            permanent=True,
        )
    if code in DENIED_CODES or status == 403:
        return S3Problem(
            f"{what} {location.uri} failed: access denied ({code or status}); grant {holder} "
            f"s3:ListBucket on bucket {location.bucket} and s3:GetObject/s3:PutObject/"
            f"s3:DeleteObject on {location.uri}/*",
            permanent=True,
        )
    if code in ("PermanentRedirect", "IllegalLocationConstraintException"):
        return S3Problem(
            f"{what} {location.uri} failed: the bucket is in another region ({code}); set "
            f"AWS_REGION in {holder} to the bucket's region",
            permanent=True,
        )
    if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return S3Problem(
            f"{what} {location.uri} failed: incomplete S3 credentials ({kind}); {holder} needs "
            "both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            permanent=True,
        )
    if kind in ("ParamValidationError", "InvalidRegionError", "InvalidEndpointConfigurationError"):
        return S3Problem(f"{what} {location.uri} failed: {kind}: {scrub(str(exc))}", True)
    if kind in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ProxyConnectionError",
        "SSLError",
    ):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS S3 endpoint"
        return S3Problem(
            f"{what} {location.uri} failed: cannot reach {endpoint} ({kind}) after retries; "
            "check AWS_ENDPOINT_URL and the network path from the pod",
            permanent=False,
        )
    detail = f"{code} (HTTP {status})" if code else kind
    return S3Problem(f"{what} {location.uri} failed: {detail}", permanent=False)
