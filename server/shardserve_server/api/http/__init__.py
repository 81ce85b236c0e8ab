"""The OpenAI-compatible HTTP API (`shardserve serve --http-port`), beside the gRPC one.

Served by uvicorn inside the front end's event loop, over the same servicer (validation,
admission, drain state, metrics) and AsyncEngine (one queue) as gRPC:

    schemas.py    pydantic models of the request and response bodies
    errors.py     OpenAI's error shape and the HTTP status of every failure
    translate.py  OpenAI request bodies -> shardserve.v1 messages; results -> OpenAI bodies
    app.py        the Starlette application: routes, auth, body limits, unary and SSE
    server.py     uvicorn in the running loop (own socket, optional TLS, graceful stop)
"""
