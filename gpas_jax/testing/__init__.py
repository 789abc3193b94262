"""What trying the package without a cloud needs: a local GCS server (gcs_server) that Orbax,
gcsfs and the workdir lock work against. Needs the test extra's gcp-storage-emulator.

May import: storage, runtime (a peer of config).
"""
