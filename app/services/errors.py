"""Errors the service layer raises, each with the HTTP status the API answers with.

Library errors (`models.errors.RecmergeError`) are bad input too and answer 422 unless a service
re-raises them as one of these.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadFile(ServiceError):
    """The upload is not the kind of file it claims to be (not safetensors, truncated)."""

    status = 400


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unprocessable(ServiceError):
    """Well-formed but unusable: wrong shapes, NaN weights, another dataset's fingerprint."""

    status = 422
