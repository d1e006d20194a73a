"""Locust observability admission webhook."""
