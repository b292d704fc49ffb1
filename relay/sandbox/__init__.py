"""The project's own Qonto and Cegid Loop servers, for the tests, the demo and the benchmarks.

They follow the documented contracts of both APIs (authentication, pagination, 30-minute attachment
URLs, 429 and 5xx, dropped connections) on real sockets. Product code never imports this package;
only ``relay.cli.demo`` does, to show the relay working without credentials.
"""
