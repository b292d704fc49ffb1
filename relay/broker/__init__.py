"""RabbitMQ: the events queue's topology, confirmed publishing, dead letters."""
