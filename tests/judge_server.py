"""A local OpenAI-compatible chat-completions server for the API judge tests, on 127.0.0.1.

It plays `server.script` first (failures: (status, headers, body), or ("sleep", seconds)), then answers like a judge
with a taste: the response shown as A wins when `server.prefers(A, B)` says so (default: the one containing "good").
`server.requests` keeps every request (path, headers, body) for the tests to inspect.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        step = self.server.script.pop(0) if self.server.script else None
        if step and step[0] == "sleep":
            time.sleep(step[1])
            return
        if step:
            status, headers, text = step
            return self._send(status, text, headers)
        question = body["messages"][-1]["content"]
        shown_a, rest = question.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)
        shown_b = rest.rsplit("\n\nWhich response is better?", 1)[0]
        answer = self.server.always or ("A" if self.server.prefers(shown_a, shown_b) else "B")
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}))

    def _send(self, status, text, headers=None):
        data = text.encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def start_server() -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.script, httpd.requests, httpd.always = [], [], None
    httpd.prefers = lambda a, b: "good" in a
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    return httpd


def stop_server(httpd: ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()
