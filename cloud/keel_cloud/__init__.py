"""Keel Cloud: devices connect over MQTT/TLS with their own certificates; the fleet
service keeps the registry and serves the HTTP API the keel CLI uses."""
