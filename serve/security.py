"""Who may call `/admin/*`: whoever holds the token in $RANKSERVE_ADMIN_TOKEN, or nobody.

Why: `POST /admin/model` swaps the model that every replica serves. Without a check, anyone who can
reach the port could swap the model. So the admin API takes a bearer token, and with no token
configured (unset or empty) it is off: every `/admin/*` request gets 403. Secure by default.

- **Read once, where the app is built** (`admin_auth`, called by serve/http_app.py's
  `build_http_app`): once per uvicorn process, once per Ray replica. Changing the variable later
  changes nothing until the process (or replica) starts again.
- **Ray replicas are separate processes**: they read the variable from their own environment. On a
  local start (serve/run.py without `--address`) they inherit it: ray.init starts the raylet from
  the driver's environment, and the raylet starts the workers from its own (checked on Ray 2.60).
  On a joined cluster (`--address`, `serve deploy`) the driver's environment does not reach them:
  put the variable in the environment of `ray start` on every node that may host a replica (or in
  the replicas' runtime_env). Never in the deployment's config: `user_config` and init args are
  shown in Ray's dashboard.
- **Clients send `Authorization: Bearer <token>`.** No bearer token: 401 with
  `WWW-Authenticate: Bearer`. A wrong one: 403. The comparison is `hmac.compare_digest` (its time
  does not tell how much of a guess was right).
- **Errors have the shape of every other 4xx** (serve/schemas.py's `RequestError`): they name the
  field (`authorization`) and the rule.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.schemas import RequestError

ADMIN_TOKEN_ENV = "RANKSERVE_ADMIN_TOKEN"
FIELD = "authorization"
DISABLED_RULE = f"the admin API is disabled: set {ADMIN_TOKEN_ENV} in the server's environment to enable it"
MISSING_RULE = f"send 'Authorization: Bearer <token>', the token in the server's ${ADMIN_TOKEN_ENV}"
WRONG_RULE = f"the bearer token is not the server's ${ADMIN_TOKEN_ENV}"

# In the OpenAPI as the `adminToken` security scheme of every admin route. auto_error=False: the
# answer to a missing token is ours (the project's error shape), not FastAPI's.
bearer = HTTPBearer(auto_error=False, scheme_name="adminToken",
                    description=f"POST /admin/*: Authorization: Bearer <${ADMIN_TOKEN_ENV}>")
# The admin routes' `responses=` entries, for the OpenAPI.
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no bearer token (`WWW-Authenticate: Bearer`)"},
    403: {"description": f"a wrong token, or the admin API is off (${ADMIN_TOKEN_ENV} unset)"},
}


class AdminAuthError(RequestError):
    """A refused admin request: answered with `status`, the error body, and `headers`."""

    def __init__(self, status: int, rule: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, FIELD, rule)
        self.headers = headers


def configured_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token in `environ` (default os.environ); None when unset or blank (the admin API is off)."""
    token = (os.environ if environ is None else environ).get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


def check_token(token: str | None, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Raise AdminAuthError unless `credentials` carry `token` (always, when `token` is None)."""
    if token is None:
        raise AdminAuthError(403, DISABLED_RULE)
    if credentials is None:  # no Authorization header, or not a Bearer one
        raise AdminAuthError(401, MISSING_RULE, headers={"WWW-Authenticate": "Bearer"})
    # Bytes on both sides: the header as received (Starlette decodes it as latin-1), the token as UTF-8.
    if not hmac.compare_digest(credentials.credentials.encode("latin-1"), token.encode()):
        raise AdminAuthError(403, WRONG_RULE)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdminAuthError)
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)


def admin_auth(app: FastAPI, environ: Mapping[str, str] | None = None) -> Any:
    """The dependency an admin route of `app` lists (`dependencies=[admin_auth(app)]`).

    Reads the token now (from `environ`, default os.environ) and installs the handler that answers
    a refusal in the project's error shape."""
    token = configured_token(environ)
    app.add_exception_handler(AdminAuthError, _refused)

    async def require_admin_token(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        check_token(token, credentials)

    return Depends(require_admin_token)
