"""The core's exceptions. Adapters map each to one gRPC status or HTTP answer (adapters/errors.py).

QuotagateError
├── InvalidRequest      bad input from a client or an admin (nothing was changed)
├── NotFound            an account or record that does not exist
└── StoreUnavailable    PostgreSQL or Redis could not be reached
"""


class QuotagateError(Exception):
    pass


class InvalidRequest(QuotagateError):
    pass


class NotFound(QuotagateError):
    pass


class StoreUnavailable(QuotagateError):
    pass
