"""Corral's services, one bounded context each: identity, session, task, runtime, storage."""
