"""The product's rules: connections, their credentials, documents and their fates."""
