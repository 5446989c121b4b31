"""Identity: certificate authorities, credentials, passwords, and the auth service logic."""
