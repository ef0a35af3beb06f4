"""An OTLP/HTTP sink for the pinned benchmark's `otel` scenario: answers every export 200 with
an empty ExportTraceServiceResponse, and counts bytes and exports (printed on SIGTERM). It does
not decode: the gateway's encoding is checked by tests/it/otel.rs against the official schema."""
import http.server
import signal
import sys

stats = {"exports": 0, "bytes": 0}


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        stats["exports"] += 1
        stats["bytes"] += n
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def bye(*_):
    print(stats, flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, bye)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
