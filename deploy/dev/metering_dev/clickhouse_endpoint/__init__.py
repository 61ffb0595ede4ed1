"""ClickHouse's HTTP interface in front of the embedded ClickHouse engine (chdb).

No ClickHouse server can be installed on the dev and CI machines, but chdb embeds the real
ClickHouse 26.x engine. This process serves that engine on ClickHouse's HTTP protocol so
clickhouse-connect, curl and Grafana talk to it exactly as they would to a server: the
SQL, the formats and the error codes are ClickHouse's own; only the HTTP layer is ours.

Each request runs on its own chdb connection handle, so `database`, URL settings and
`SET`/`USE` stay scoped to the request as on a server. A request with `session_id` gets
a handle that lives as long as the session (temporary tables, `SET`), and its per-request
URL settings are undone afterwards. chdb hosts one engine per process and its calls are
serialized with one lock; the HTTP layer is threaded.

    python -m metering_dev.clickhouse_endpoint --port 8123 --data-dir DIR
        [--user U --password P] [--tls-cert CHAIN.pem --tls-key KEY.pem]   # HTTPS, like ClickHouse's https_port

The modules, each readable alone (later ones build on earlier ones, never the reverse):

- `errors`: ClickHouseError, the error codes this endpoint raises, the code -> HTTP status table.
- `log`: the one logger the modules share.
- `sql`: just enough SQL scanning to classify a query, find its FORMAT clause and inline INSERT data.
- `compression`: request body decoding (Content-Encoding) and response encoding.
- `query_request`: QueryRequest, URL and multipart parameters, which are transport options vs engine settings.
- `auth`: the Authenticator and how HTTP credentials are read.
- `engine`: the chdb Engine, its per-request and per-session handles, applying and undoing settings.
- `handler`: the threaded HTTP server and request handler, response headers and content types.
- `server`: lifecycle: TLS context, serve(), stop signals and main() (the command line).
"""
