FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sql ./sql
COPY consumers ./consumers
COPY relay ./relay
# a plain install: the wheel carries the SQL (relay/store/sql links to sql/), templates and styles
RUN pip install --no-cache-dir . && rm -rf /src && useradd --system relay
WORKDIR /
USER relay
CMD ["relay", "run"]
