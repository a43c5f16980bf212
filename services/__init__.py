"""durable: Durable Objects for Python, on NATS and PostgreSQL."""
