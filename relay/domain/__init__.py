"""The product's rules for connections, their credentials, documents and their fates."""
