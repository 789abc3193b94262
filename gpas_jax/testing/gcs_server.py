"""A GCS JSON API server on 127.0.0.1 that Orbax, gcsfs and the workdir lock work against:
gcp-storage-emulator, plus what real GCS does and the bare emulator does not (the object
generation headers tensorstore's checkpoint writes need, the generation preconditions the lock
relies on, suffix ranges).

    python -m gpas_jax.testing.gcs_server --port 8123 --bucket mybucket [--data_dir DIR]

then, in the shell that runs train.py (or any tool):

    export STORAGE_EMULATOR_HOST=http://127.0.0.1:8123 TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:8123

Objects live in memory, or in --data_dir so a restart keeps them. Needs the test extra
(pip install 'gpas_jax[test]'). The bare emulator (`gcp-storage-emulator start`) fails a run at
its second checkpoint ('Malformed StorageGeneration'): its downloads carry no generation.
"""

import http
import re
import time

from gpas_jax.runtime import cli

try:
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
except ImportError:  # a plain install: the emulator comes with the test extra (serve says so)
  objects = None


def _generation(storage, bucket: str, name: str) -> int:
  try:
    return int(storage.get_file_obj(bucket, name).get('generation', 0))
  except NotFound:
    return 0


def _precondition_failed(request, storage, name: str | None) -> bool:
  want = request.query.get('ifGenerationMatch')
  if not want or name is None:
    return False
  return int(want[0]) != _generation(storage, request.params['bucket_name'], name)


def _insert_name(request) -> str | None:
  if 'name' in request.query:
    return request.query['name'][0]
  data = request.data
  if isinstance(data, dict):
    return (data.get('meta') or data).get('name')
  return None


if objects is not None:
  _insert, _delete, _download = objects.insert, objects.delete, objects.download


def insert(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, storage, _insert_name(request)):
    response.status = http.HTTPStatus.PRECONDITION_FAILED
    return None
  return _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, storage, request.params.get('object_id')):
    response.status = http.HTTPStatus.PRECONDITION_FAILED
    return None
  return _delete(request, response, storage, *args, **kwargs)


def download(request, response, storage, *args, **kwargs):
  # A suffix range (bytes=-N, the last N bytes: how a reader finds a file's footer) is served
  # whole by the emulator; GCS serves the suffix. Rewritten as the absolute range it means.
  headers = request._request_handler.headers  # pylint: disable=protected-access
  m = re.fullmatch(r'\s*bytes=-(\d+)\s*', headers.get('range', '') or '')
  if m:
    try:
      size = len(storage.get_file(request.params['bucket_name'], request.params['object_id']))
    except NotFound:
      size = 0
    del headers['range']
    headers['range'] = f'bytes={max(0, size - int(m.group(1)))}-'
  try:  # GCS names the generation read; tensorstore's conditional writes need it
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(obj.get('generation', ''))
    response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
  except NotFound:
    pass
  return _download(request, response, storage, *args, **kwargs)


if objects is not None:  # before the server module builds its routes from these names
  objects.insert, objects.delete, objects.download = insert, delete, download


def serve(port: int, data_dir: str | None = None, buckets: tuple[str, ...] = ()) -> None:
  """Serves on 127.0.0.1:port until killed, with `buckets` created (kept ones reused)."""
  if objects is None:
    raise cli.UserError("the local GCS server needs gcp-storage-emulator: pip install "
                        "'gpas_jax[test]' (or gcp-storage-emulator==2026.7.19)")
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  server = create_server('127.0.0.1', port, in_memory=data_dir is None, data_dir=data_dir)
  server.start()
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
  from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  url = f'http://127.0.0.1:{port}'
  client = gcs.Client(project='local', credentials=AnonymousCredentials(),
                      client_options={'api_endpoint': url})
  for name in buckets:
    try:
      client.create_bucket(name)
    except exceptions.Conflict:
      pass
  where = f'objects in {data_dir}' if data_dir else 'objects in memory'
  print(f'GCS server on {url} ({where}; buckets: {", ".join(buckets) or "none"}). Point a run '
        f'at it:\n  export STORAGE_EMULATOR_HOST={url} TENSORSTORE_GCS_HTTP_URL={url}',
        flush=True)
  try:
    while True:
      time.sleep(1)
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()


def main(argv: list[str]) -> None:
  """The command line: --port, --bucket (repeatable), --data_dir."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from gpas_jax.runtime import console  # pylint: disable=import-outside-toplevel
  del argv
  console.quiet_logs()  # each request's log line only with --verbosity=0
  f = flags.FLAGS
  serve(f.port, f.data_dir or None, tuple(f.bucket or ()))


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_integer('port', 8123, 'Port on 127.0.0.1.')
  flags.DEFINE_multi_string('bucket', [], 'A bucket to create (repeat for more).')
  flags.DEFINE_string('data_dir', '', 'Keep the objects in this folder (default: in memory).')


if __name__ == '__main__':
  from gpas_jax.runtime import cli  # pylint: disable=import-outside-toplevel
  _define_flags()
  cli.run(main)
