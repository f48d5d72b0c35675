"""Client for the host-agent protocol: asks one host's agent to delete a VM's files, or what the host holds.

Every way a host can misbehave (refuse, err, hang, drop the connection, answer nonsense, fail TLS) comes
back as a `HostDeleteResult` with `ok=False` and a short reason, never as an exception, because the
removal job treats a failed host as data (its files become orphans), not as a crash. The result also says
whether the host answered at all, which is what its health (app/service/orphans/health.py) goes by.
"""

import asyncio
import itertools
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import TypeAdapter, ValidationError

from app.protocol import (
    DELETE_ANSWER,
    DELETE_PATH,
    HEALTH_PATH,
    MAX_SCAN_ENTRIES,
    SCAN_ANSWER,
    SCAN_PATH,
    DeleteFailed,
    DeleteRequest,
    FileToDelete,
    ScanEntry,
    ScanRequest,
    describe_file_error,
    describe_invalid,
)
from app.service.metrics import AGENT_CALL_DURATION, AGENT_CALLS_TOTAL
from app.service.trace_context import inject_trace_context

__all__ = [
    "AgentClient",
    "AgentTlsError",
    "FileToDelete",
    "HostContact",
    "HostDeleteResult",
    "HostScanResult",
    "agent_session",
    "agent_ssl_context",
    "not_called",
    "not_scanned",
]

logger = logging.getLogger(__name__)

# An answer lists at most the paths we sent plus a few bytes of JSON per path; anything far larger is
# a broken or hostile agent, and reading it whole would let one host eat the process's memory.
_MIN_ANSWER_LIMIT = 1024 * 1024
_ANSWER_LIMIT_FACTOR = 4
_READ_CHUNK = 64 * 1024
# A scan answer lists at most MAX_SCAN_ENTRIES entries; a kilobyte each leaves room for long paths.
_SCAN_ANSWER_LIMIT = MAX_SCAN_ENTRIES * 1024

# How many unconfirmed paths a reason names before it summarises the rest, so that the reason
# stays short enough for a log line and the job's `error` column.
_PATHS_NAMED_IN_REASON = 3
# An agent's own error text is echoed into our reason; bounding it keeps a chatty agent from
# filling logs and the database. An agent's "in use: ..." names up to three files or domains, with their paths
# and the processes that hold them: that must reach the operator whole.
_MAX_AGENT_ERROR_CHARS = 600

Outcome = Literal["ok", "failed", "timeout", "unreachable"]

HostContact = Literal["answered", "unanswered", "not_called"]
"""Whether a host answered a call: "answered" is a whole 200 answer, whatever it says (a 200 with success:false
too); "unanswered" is everything else (no connection, timeout, TLS, a status other than 200, an answer cut short);
"not_called" is a call that was never sent because the host was known to be failing."""


@dataclass(frozen=True)
class HostDeleteResult:
    """What one host's delete call came to."""

    ok: bool
    """True only for a 200 with success:true and every requested path in deleted or missing."""
    deleted: list[str]
    missing: list[str]
    error: str | None
    """Short human reason when not ok, e.g. "HTTP 500" or "timeout after 10s"."""
    contact: HostContact
    """Whether the host answered; a host's health trips only on "unanswered"."""


class _CallFailed(Exception):
    """Ends one call early with the outcome label and reason that the result and metrics carry."""

    def __init__(self, outcome: Outcome, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.outcome: Outcome = outcome
        self.reason = reason
        self.status = status
        """The HTTP status of an answer other than 200; None when there was none."""


@dataclass(frozen=True)
class HostScanResult:
    """What one host's scan call came to."""

    ok: bool
    """True only for a 200 with success:true that validates (at most MAX_SCAN_ENTRIES entries)."""
    entries: list[ScanEntry]
    truncated: bool
    error: str | None
    contact: HostContact


_Answer = TypeVar("_Answer")
_Result = TypeVar("_Result", HostDeleteResult, HostScanResult)

# What an agent older than the scan answers it: it has no such operation.
_OLDER_AGENT_STATUSES = frozenset({404})


def not_called(failing_since: datetime, last_error: str | None) -> HostDeleteResult:
    """The result of a call that was not sent because its host is failing (since when, why); its files stay."""
    return _failure(_not_called_reason(failing_since, last_error), "not_called")


def not_scanned(failing_since: datetime, last_error: str | None) -> HostScanResult:
    """The result of a scan that was not sent because its host is failing (since when, why)."""
    return _scan_failure(_not_called_reason(failing_since, last_error), "not_called")


def _not_called_reason(failing_since: datetime, last_error: str | None) -> str:
    since = failing_since.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return f"host failing since {since} ({last_error or 'no answer'}); not called"


@dataclass
class _HostLane:
    """One agent's share of the process's calls: its own slots, and the last time it left a call unanswered."""

    slots: asyncio.Semaphore
    users: int = 0
    """Calls holding or waiting for a slot; the lane is dropped when none is left."""
    unanswered_at: int | None = None
    """The call sequence number at which the agent last failed to answer, None once it answered again."""
    unanswered_since: datetime | None = None
    """When the agent first failed to answer since it last answered."""
    unanswered_error: str | None = None


class AgentTlsError(Exception):
    """A TLS file of the settings (AGENT_CA_FILE, AGENT_CERT_FILE, AGENT_KEY_FILE) that cannot be used."""


def agent_ssl_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """The TLS context of every `https://` agent call: agents verified against `ca_file` (unset: the system's CAs),
    and, with `cert_file`, the client certificate the service presents (mutual TLS); AgentTlsError says what is wrong.

    `key_file` may be left out when `cert_file` holds the key too.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise AgentTlsError(f"AGENT_CA_FILE {ca_file}: {describe_file_error(error)}") from None
    if key_file is not None and cert_file is None:
        raise AgentTlsError("AGENT_KEY_FILE is set but AGENT_CERT_FILE is not")
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as error:
            files = f"AGENT_CERT_FILE {cert_file}" + (f" / AGENT_KEY_FILE {key_file}" if key_file else "")
            raise AgentTlsError(f"{files}: {describe_file_error(error)}") from None
    return context


def agent_session(
    concurrency: int, ssl_context: ssl.SSLContext, trace_configs: Sequence[aiohttp.TraceConfig] = ()
) -> aiohttp.ClientSession:
    """The one HTTP session a process calls agents through: `concurrency` connections, kept alive between calls.

    Keep-alive matters most over TLS: a handshake costs far more than a delete call, so each connection's
    handshake is paid once, not per call. `trace_configs` make a span of each call (app/service/tracing.py).
    """
    return aiohttp.ClientSession(
        trace_configs=list(trace_configs),
        connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ssl=ssl_context),
        # Agent calls are bounded by AgentClient; a timer of the session's own for every call (its default is
        # 5 minutes) would bound nothing more and cost each call another timer.
        timeout=aiohttp.ClientTimeout(total=None),
    )


class AgentClient:
    """Calls host agents over one shared aiohttp session, with a bound on calls in flight, overall and per agent.

    Calls to one agent take a slot of its lane (`host_concurrency`, default: no bound but `concurrency`) before one
    of the process's, so that calls queued behind a hanging agent hold none of the slots other agents need. When an
    agent leaves a call unanswered, the calls to it that were already queued are not sent (`not_called`): they would
    only wait out the same timeout, and the host is failing now.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        timeout_seconds: float,
        concurrency: int,
        host_concurrency: int | None = None,
        token: str | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if host_concurrency is not None and host_concurrency < 1:
            raise ValueError("host_concurrency must be at least 1")
        self._session = session
        self._timeout_seconds = timeout_seconds
        self._slots = asyncio.Semaphore(concurrency)
        self._host_concurrency = min(concurrency, host_concurrency or concurrency)
        self._lanes: dict[str | uuid.UUID, _HostLane] = {}
        self._call_sequence = itertools.count()
        self._token = token
        self._seen_agent_urls: set[str] = set()

    def warn_if_plain_http(self, agent_url: str) -> None:
        """Log, once per agent URL and so once per host, that an agent is called over plain HTTP.

        Called at start for every known host, and by the first call to a host added since.
        """
        if agent_url in self._seen_agent_urls:
            return
        self._seen_agent_urls.add(agent_url)
        if urlsplit(agent_url).scheme == "http":
            logger.warning(
                "agent is called over plain HTTP agent_url=%s: the agent is not authenticated and its token and "
                "requests can be read on the network (docs/operations.md: Running agents over mutual TLS)",
                agent_url,
            )

    async def delete_files(
        self,
        agent_url: str,
        vm_uuid: uuid.UUID,
        files: Sequence[FileToDelete],
        *,
        host_uuid: uuid.UUID | None = None,
    ) -> HostDeleteResult:
        """Ask the agent at `agent_url` to delete `files` of `vm_uuid`; never raises but on cancellation.

        The call goes through the lane of host `host_uuid` (of its agent URL when none is given): hosts are told
        apart by their UUID, as their health is, even where two share an agent.

        The time spent waiting for a free slot is not part of the timeout: under load a call queues
        behind others, and only the call itself (connect, send, read the whole answer) is bounded.
        A call that cannot even connect counts as "unreachable"; once connected, anything short of
        a complete, confirming answer counts as "failed" (or "timeout"). A call still queued for the agent's
        lane when the agent leaves another call unanswered is not sent at all (contact "not_called").
        """
        self.warn_if_plain_http(agent_url)
        url = agent_url.rstrip("/") + DELETE_PATH
        body = DeleteRequest(vm_uuid=vm_uuid, files=list(files)).model_dump_json().encode()
        requested = [f.path for f in files]
        result = await self._through_lane(
            agent_url if host_uuid is None else host_uuid,
            lambda: self._send(url, body, lambda raw: _interpret_answer(raw, requested), _failure),
            not_called,
        )
        logger.debug(
            "agent call done vm_uuid=%s agent_url=%s count=%d contact=%s error=%s",
            vm_uuid,
            agent_url,
            len(files),
            result.contact,
            result.error,
        )
        return result

    async def scan(self, agent_url: str, *, host_uuid: uuid.UUID) -> HostScanResult:
        """Ask the agent at `agent_url` what its host holds (`POST /host-files/scan`); never raises but on
        cancellation.

        It goes through the host's lane and is bounded as a delete call is. An agent that answers 404 is an older
        agent that cannot scan: that is an answer (contact "answered"), and the result says so.
        """
        self.warn_if_plain_http(agent_url)
        url = agent_url.rstrip("/") + SCAN_PATH
        body = ScanRequest().model_dump_json().encode()
        result = await self._through_lane(
            host_uuid,
            lambda: self._send(
                url,
                body,
                _interpret_scan,
                _scan_failure,
                answered_statuses=_OLDER_AGENT_STATUSES,
                answer_limit=_SCAN_ANSWER_LIMIT,
            ),
            not_scanned,
        )
        logger.debug("agent scan done agent_url=%s contact=%s error=%s", agent_url, result.contact, result.error)
        return result

    async def _through_lane(
        self,
        lane_key: str | uuid.UUID,
        send: Callable[[], Awaitable[_Result]],
        not_sent: Callable[[datetime, str | None], _Result],
    ) -> _Result:
        """Send one call through the lane of `lane_key` (a host, or an agent URL); `not_sent` makes the result of a
        call not sent because the agent left another call unanswered while this one queued."""
        lane = self._lanes.get(lane_key)
        if lane is None:
            lane = self._lanes[lane_key] = _HostLane(asyncio.Semaphore(self._host_concurrency))
        queued_at = next(self._call_sequence)
        lane.users += 1
        try:
            async with lane.slots:
                if (
                    lane.unanswered_since is not None
                    and lane.unanswered_at is not None
                    and lane.unanswered_at > queued_at
                ):
                    return not_sent(lane.unanswered_since, lane.unanswered_error)
                result = await send()
            if result.contact == "answered":
                lane.unanswered_at = lane.unanswered_since = None
            else:
                lane.unanswered_at = next(self._call_sequence)
                lane.unanswered_since = lane.unanswered_since or datetime.now(UTC)
                lane.unanswered_error = result.error
            return result
        finally:
            lane.users -= 1
            if not lane.users:
                del self._lanes[lane_key]

    async def _send(
        self,
        url: str,
        body: bytes,
        interpret: Callable[[bytes], _Result],
        failure: Callable[[str, HostContact], _Result],
        answered_statuses: frozenset[int] = frozenset(),
        answer_limit: int | None = None,
    ) -> _Result:
        """Send one call in one of the process's slots, bounded by the timeout; its result, and its metrics.

        An answer longer than `answer_limit` bytes (by default, a few times the request's) fails the call.
        A status in `answered_statuses` is an answer that fails the call, not a host that did not answer.
        """
        if answer_limit is None:
            answer_limit = max(_MIN_ANSWER_LIMIT, _ANSWER_LIMIT_FACTOR * len(body))
        async with self._slots:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._timeout_seconds):
                    answer = await self._post(url, body, answer_limit)
            except TimeoutError:
                outcome: Outcome = "timeout"
                result = failure(f"timeout after {self._timeout_seconds:g}s", "unanswered")
            except _CallFailed as failed:
                outcome = failed.outcome
                result = failure(failed.reason, "answered" if failed.status in answered_statuses else "unanswered")
            else:
                try:
                    result = interpret(answer)
                    outcome = "ok"
                except _CallFailed as failed:
                    outcome = failed.outcome
                    result = failure(failed.reason, "answered")
            AGENT_CALL_DURATION.observe(time.perf_counter() - started)
        AGENT_CALLS_TOTAL.labels(outcome=outcome).inc()
        return result

    async def _post(self, url: str, body: bytes, limit: int) -> bytes:
        """Send the request and return the body of a 200 answer of at most `limit` bytes, or raise _CallFailed."""
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        inject_trace_context(headers)
        try:
            # The caller's asyncio.timeout is the call's one timer. No redirect is followed: it would carry the
            # bearer token to another address.
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                if response.status != 200:
                    raise _CallFailed("failed", await _http_error_reason(response, limit), response.status)
                raw = await _read_limited(response, limit)
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise _CallFailed("unreachable", f"invalid agent URL: {exc}") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _CallFailed("unreachable", _tls_reason(exc.certificate_error)) from exc
        except aiohttp.ClientConnectorSSLError as exc:
            raise _CallFailed("unreachable", _tls_reason(exc.os_error)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise _CallFailed("unreachable", _connect_error_reason(exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if urlsplit(url).scheme == "https" and await self._refuses_new_connections(url):
                raise _CallFailed("unreachable", _CLIENT_CERTIFICATE_REFUSED) from exc
            if isinstance(exc, aiohttp.ServerDisconnectedError):
                raise _CallFailed("failed", "connection closed by agent before answering") from exc
            raise _CallFailed("failed", f"connection error: {_describe(exc)}") from exc
        except aiohttp.ClientPayloadError as exc:
            raise _CallFailed("failed", "answer cut short (connection closed mid-body)") from exc
        except TimeoutError:
            # aiohttp's own timeouts are TimeoutErrors too; the caller reports them as a timeout.
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise _CallFailed("failed", f"connection error: {_describe(exc)}") from exc
        return raw

    async def _refuses_new_connections(self, url: str) -> bool:
        """Whether the agent at `url` closes a new connection as soon as the TLS handshake is done.

        That is how a TLS 1.3 agent refuses our client certificate (or its absence): the client's side of the
        handshake is over before the agent checks the certificate, and the agent then closes the connection
        without a word. A disconnect alone could also be an agent going away, so it is told apart by asking the
        agent's health check on a connection of its own; this costs a call only on this failure path.
        """
        probe = url.removesuffix(DELETE_PATH).removesuffix(SCAN_PATH) + HEALTH_PATH
        try:
            async with self._session.get(probe, headers={"Connection": "close"}, allow_redirects=False) as response:
                await response.read()
        except aiohttp.ClientConnectorError:
            return False
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return True
        except (aiohttp.ClientError, OSError):
            return False
        return False


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read the whole answer body, failing as soon as it grows past `limit` bytes."""
    if response.content_length is not None:
        if response.content_length > limit:
            raise _CallFailed("failed", "answer too large")
        # aiohttp reads no more than the declared length.
        return await response.read()
    data = bytearray()
    async for chunk in response.content.iter_chunked(_READ_CHUNK):
        data += chunk
        if len(data) > limit:
            raise _CallFailed("failed", "answer too large")
    return bytes(data)


async def _http_error_reason(response: aiohttp.ClientResponse, limit: int) -> str:
    """Describe a non-200 answer as "HTTP <status>", plus the agent's error text when it gave one."""
    reason = f"HTTP {response.status}"
    try:
        answer = DeleteFailed.model_validate_json(await _read_limited(response, limit))
    except (_CallFailed, aiohttp.ClientError, OSError, ValidationError):
        # The status already says the call failed; a body we cannot read adds nothing worth a
        # different reason.
        return reason
    return f"{reason}: {_shorten(answer.error)}"


def _validated(adapter: TypeAdapter[_Answer], raw: bytes) -> _Answer:
    """An answer checked against the protocol, or _CallFailed saying what is wrong with it."""
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        if any(problem["type"] == "json_invalid" for problem in exc.errors()):
            raise _CallFailed("failed", "invalid JSON") from exc
        raise _CallFailed("failed", f"invalid answer: {_shorten(describe_invalid(exc))}") from exc


def _interpret_answer(raw: bytes, requested: Sequence[str]) -> HostDeleteResult:
    """Turn a 200 answer into a result, checking it against the protocol and that every requested path is confirmed."""
    answer = _validated(DELETE_ANSWER, raw)
    if isinstance(answer, DeleteFailed):
        raise _CallFailed("failed", f"agent error: {_shorten(answer.error)}")
    confirmed = set(answer.deleted) | set(answer.missing)
    unconfirmed = list(dict.fromkeys(p for p in requested if p not in confirmed))
    if unconfirmed:
        named = ", ".join(unconfirmed[:_PATHS_NAMED_IN_REASON])
        rest = len(unconfirmed) - _PATHS_NAMED_IN_REASON
        more = f" (and {rest} more)" if rest > 0 else ""
        raise _CallFailed("failed", f"paths not confirmed: {named}{more}")
    return HostDeleteResult(ok=True, deleted=answer.deleted, missing=answer.missing, error=None, contact="answered")


def _interpret_scan(raw: bytes) -> HostScanResult:
    """Turn a 200 answer to a scan into a result, checking it against the protocol."""
    answer = _validated(SCAN_ANSWER, raw)
    if isinstance(answer, DeleteFailed):
        raise _CallFailed("failed", f"agent error: {_shorten(answer.error)}")
    return HostScanResult(ok=True, entries=answer.entries, truncated=answer.truncated, error=None, contact="answered")


def _scan_failure(reason: str, contact: HostContact) -> HostScanResult:
    """Build the result of a failed scan; an older agent's 404 says that it cannot scan."""
    if contact == "answered" and reason.startswith("HTTP 404"):
        reason = f"the agent cannot scan ({reason}): an agent older than the scan"
    return HostScanResult(ok=False, entries=[], truncated=False, error=reason, contact=contact)


def _failure(reason: str, contact: HostContact) -> HostDeleteResult:
    """Build the result of a failed call."""
    return HostDeleteResult(ok=False, deleted=[], missing=[], error=reason, contact=contact)


# What a failed call says when the agent closes every new connection right after the TLS handshake.
_CLIENT_CERTIFICATE_REFUSED = "TLS: client certificate refused (the agent closes the connection after the handshake)"


def _tls_reason(error: BaseException) -> str:
    """Describe a failed TLS handshake as "TLS: ...", e.g. "TLS: certificate verify failed: IP address mismatch"."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        # OpenSSL's reason code, e.g. WRONG_VERSION_NUMBER for an agent that speaks plain HTTP.
        return f"TLS: {error.reason.lower().replace('_', ' ')}"
    return f"TLS: {_describe(error)}"


def _connect_error_reason(exc: aiohttp.ClientConnectorError) -> str:
    """Describe why a connection could not be opened, without aiohttp's long wording."""
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return f"cannot connect: {_describe(exc.os_error)}"


def _describe(exc: BaseException) -> str:
    """Give an exception's short description, falling back to its type name when it has no text."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _shorten(str(exc)) or type(exc).__name__


def _shorten(text: str) -> str:
    """Cut text that goes into a reason to a length that fits a log line."""
    if len(text) <= _MAX_AGENT_ERROR_CHARS:
        return text
    return text[: _MAX_AGENT_ERROR_CHARS - 3] + "..."
