"""What the server keeps between requests: responses and conversations, in SQLite."""
