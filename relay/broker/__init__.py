"""The events queue's topology on RabbitMQ, confirmed publishing and dead letters."""
