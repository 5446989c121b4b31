"""What the CLI uses as a library: profiles, the API client, admin access."""
