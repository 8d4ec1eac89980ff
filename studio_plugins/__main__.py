from studio_plugins.cli import main

main()
