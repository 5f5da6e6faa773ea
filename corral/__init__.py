"""Corral: self-hosted Claude agents as a service."""
