"""What runs, and when: config, the home, feeds, the maintenance cycle, the service, the CLI."""
