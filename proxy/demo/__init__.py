"""The bundled legacy-backend simulator, a polling client, and the `pollguard demo` runner."""
