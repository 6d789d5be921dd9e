"""The folder a new session is copied from (fastsd.session.create): README.txt and the
session's empty folders. Installed inside the package as ``fastsd.sessions_template``; this
file (which makes it importable there) and the ``.keep`` files are not copied."""
