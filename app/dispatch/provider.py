"""Calls to the payment provider, classified into the outcomes the dispatcher acts on.

Every call for a payment sends the payment's own provider key and identical parameters, so
any retry — by this leader or the next — is answered with the original result. What an
answer means is decided in ``app.domain.outcome``; this module only moves bytes, and never
follows a redirect (a POST turned into a GET at another address proves nothing).
"""

from __future__ import annotations

import aiohttp
from yarl import URL

from app.domain.outcome import Charge, charge_from_ledger, classify_charge_answer, decode_body
from app.domain.payment import ChargeRequest
from app.errors import UnknownOutcome


class ProviderClient:
    """A thin client over one shared aiohttp session (its connector keeps connections to
    the provider alive; its owner sizes and closes it)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.charges_url = f"{self.base_url}/v1/charges"
        self.session = session
        # Parsed once: a str URL is parsed (and its host encoded) again on every call.
        self._charges = URL(f"{self.base_url}/v1/charges")

    async def charge(
        self, request: ChargeRequest, *, timeout: float, traceparent: str | None = None
    ) -> Charge:
        """POST /v1/charges. Returns this payment's Charge, or raises what
        ``classify_charge_answer`` raises; a timeout or a lost connection is UnknownOutcome.
        ``traceparent`` (tracing on) goes along so the provider's spans join the trace.
        """
        headers = {"Idempotency-Key": request.provider_key, "Content-Type": "application/json"}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        try:
            async with self.session.post(
                self._charges,
                data=request.body(),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                raw = await resp.read()
        except TimeoutError as exc:
            raise UnknownOutcome(f"provider did not answer within {timeout:.2f}s") from exc
        except aiohttp.ClientError as exc:
            raise UnknownOutcome(
                f"provider connection failed: {type(exc).__name__}: {exc}"
            ) from exc
        return classify_charge_answer(status, raw, request, retry_after=retry_after)

    async def find_by_key(self, provider_key: str, *, timeout: float) -> Charge | None:
        """Look a charge up in the provider's ledger by its key (reconciliation). Raises
        UnknownOutcome when the ledger cannot be read or answers something unusable."""
        try:
            async with self.session.get(
                self._charges,
                params={"idempotency_key": provider_key, "limit": "1"},
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise UnknownOutcome(
                        f"ledger lookup answered {resp.status}", status=resp.status
                    )
                payload = decode_body(await resp.read())
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UnknownOutcome(f"ledger lookup failed: {exc}") from exc
        return charge_from_ledger(payload, provider_key)
