"""The HTTP edge both the supervisor's @api routes and the LLM Frontend stand on.

* `server`: listening sockets and uvicorn inside a worker's own event loop;
* `streaming`: a streamed response that cancels its producer when the client leaves;
* `errors`: the one mapping from an error to an HTTP status, and the one error body.

It imports only the runtime (for error codes): the SDK, the supervisor and the LLM library
all build on it, nothing here knows them.
"""
