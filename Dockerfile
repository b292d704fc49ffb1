FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY consumers ./consumers
COPY sql ./sql
# editable: the SQL files stay at /app/sql, next to the package that loads them
RUN pip install --no-cache-dir -e . && useradd --system relay
USER relay
CMD ["relay", "run"]
