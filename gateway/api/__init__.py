"""HTTP controllers: thin handlers that call a service and return a schema."""
