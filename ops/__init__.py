"""Running payonce: settings, logging, migrations, accounts, the CLI and local services."""
