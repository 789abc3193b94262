"""A GCS JSON API server on 127.0.0.1 for the storage tests: gcp-storage-emulator, plus the
generation preconditions real GCS enforces and the emulator ignores, the suffix ranges it
serves whole, and the generation headers its downloads lack.

    python tests/gcs_server.py PORT [DATA_DIR]   (objects in memory, or kept in DATA_DIR)

The workdir lock relies on `ifGenerationMatch` (create only if absent, release only one's own
generation): the emulator accepts such writes and deletes unconditionally, so this wrapper
answers 412 Precondition Failed where GCS would, before the emulator's own handler runs.
"""

import http
import re
import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


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


# Before the server module builds its routes from these names.
objects.insert, objects.delete, objects.download = insert, delete, download


def main(port: int, data_dir: str | None = None) -> None:
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  create_server('127.0.0.1', port, in_memory=data_dir is None, data_dir=data_dir).run()


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
