"""One thin module per `isic-jax` subcommand: absl flags + a `main(argv)` that calls the library."""
