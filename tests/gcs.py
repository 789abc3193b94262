"""A GCS server on 127.0.0.1 for the storage tests, and what a test needs to point runs at it.

The clients are pointed at it by the two variables a user sets, STORAGE_EMULATOR_HOST and
TENSORSTORE_GCS_HTTP_URL, and nothing else (gpas_jax.storage derives the rest). No test may
reach beyond 127.0.0.1: `check_local` fails a test whose environment names another host.
"""

import os
import subprocess
import sys
import time
import urllib.request

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VARS = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL', 'CLOUD_STORAGE_EMULATOR_ENDPOINT')


def check_local(env) -> None:
  """Fails unless every storage client of `env` is pointed at 127.0.0.1."""
  for name in _VARS:
    value = env.get(name)
    if value is not None:
      host = value.split('://', 1)[-1].split('/', 1)[0].rsplit(':', 1)[0]
      assert host == '127.0.0.1', f'{name}={value}: the storage tests only reach 127.0.0.1'


class Server:
  """One gpas_jax.testing.gcs_server process (objects in memory, or in data_dir so a restart
  keeps them)."""

  def __init__(self, data_dir: str | None = None, port: int | None = None):
    self.port = port or free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.data_dir = data_dir
    self.proc = None

  def start(self) -> 'Server':
    args = [sys.executable, '-m', 'gpas_jax.testing.gcs_server', f'--port={self.port}']
    self.proc = subprocess.Popen(args + ([f'--data_dir={self.data_dir}'] if self.data_dir else []),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, 'PYTHONPATH': ROOT})
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b?project=local', timeout=1).read()
        return self
      except OSError:
        if time.time() > deadline or self.proc.poll() is not None:
          raise RuntimeError(f'the GCS server on port {self.port} did not start')
        time.sleep(0.1)

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()

  def env(self) -> dict[str, str]:
    """The two variables a user sets to point a run at this server."""
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url}

  def create_bucket(self, name: str) -> None:
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
    from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
    os.environ['STORAGE_EMULATOR_HOST'] = self.url  # read by the client at construction
    gcs.Client(project='local', credentials=AnonymousCredentials()).create_bucket(name)


def point_this_process_at(server: Server) -> None:
  """Sets the two variables here and lets gpas_jax.storage derive the rest."""
  from gpas_jax import storage  # pylint: disable=import-outside-toplevel
  os.environ.update(server.env())
  for name in ('CLOUD_STORAGE_EMULATOR_ENDPOINT', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
    os.environ.pop(name, None)
  storage.configure_clients()
  storage._CLIENT = None  # pylint: disable=protected-access
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.filesystem('gs').clear_instance_cache()  # gcsfs caches its endpoint per instance
  check_local(os.environ)


def upload_tree(local_dir: str, url: str) -> None:
  """Copies a local folder into the bucket."""
  from gpas_jax import storage  # pylint: disable=import-outside-toplevel
  storage.copy_tree(local_dir, url)


def child_env(server: Server, **extra: str) -> dict[str, str]:
  """A subprocess environment: this one, the server's two variables, nothing derived."""
  env = {k: v for k, v in os.environ.items()
         if k not in _VARS + ('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'GOOGLE_AUTH_TOKEN_FOR_TESTING')}
  env.update(server.env(), PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **extra)
  check_local(env)
  return env


class RefusingProxy:
  """A proxy in front of a Server (in a thread of the test process) that answers 403 to every
  download of an object whose name matches `refuse`: one host's view of a bucket it may no
  longer read (a service-account change), while the other hosts reach the server directly."""

  def __init__(self, server: Server, refuse: str):
    import http.client  # pylint: disable=import-outside-toplevel
    import http.server  # pylint: disable=import-outside-toplevel
    import re  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    import urllib.parse  # pylint: disable=import-outside-toplevel
    pattern, upstream = re.compile(refuse), server.port
    self.refused = 0
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def _forward(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        name = urllib.parse.unquote(self.path.split('?', 1)[0])
        if self.command == 'GET' and 'alt=media' in self.path and pattern.search(name):
          proxy.refused += 1
          data = b'{"error": {"code": 403, "message": "caller does not have storage.objects.get"}}'
          self.send_response(403)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(data)))
          self.end_headers()
          self.wfile.write(data)
          return
        conn = http.client.HTTPConnection('127.0.0.1', upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ('connection', 'transfer-encoding', 'content-length')}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
          if k.lower() not in ('connection', 'transfer-encoding', 'content-length'):
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      def _quiet_forward(self):
        try:
          self._forward()
        except (BrokenPipeError, ConnectionResetError):  # a host exited mid-answer
          self.close_connection = True

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _quiet_forward

      def log_message(self, *args):  # quiet
        pass

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.port = self._httpd.server_address[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()

  def env(self) -> dict[str, str]:
    """The two variables that point a host at the proxy instead of the server."""
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url}

  def stop(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
