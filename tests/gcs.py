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
