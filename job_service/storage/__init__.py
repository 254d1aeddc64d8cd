"""PostgreSQL storage: the declared schema, sessions/transactions, and every SQL statement."""
