"""The `Link: <...>; rel="next"` header of paged list answers."""

from fastapi import Request, Response


def set_next_link(request: Request, response: Response, next_cursor: str | None) -> None:
    """Point the caller at the next page (same query, `after` replaced), when there is one."""
    if next_cursor is None:
        return
    params = dict(request.query_params)
    params["after"] = next_cursor
    url = request.url.replace_query_params(**params)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
