"""The ``bastion`` command: one module per command group; parsing and printing only."""
