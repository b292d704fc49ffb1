"""PostgreSQL: the pool, migrations, and every statement the relay runs."""
