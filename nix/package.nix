{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "cvm-init";
  inherit ((lib.importTOML ../Cargo.toml).package) version;

  # Only what the build reads: a README edit does not rebuild the binary.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      # Declared in Cargo.toml ([[bench]]) and shared with it, so cargo needs them to exist.
      ../benches
      ../tests
      ../deploy
    ];
  };

  # Every dependency comes from crates.io with its checksum in Cargo.lock: no vendor hash.
  cargoLock.lockFile = ../Cargo.lock;

  # The integration tests in tests/ need Garage, rclone, FUSE, podman and root, none of
  # which the build sandbox has; they run in CI (`./scripts/test`). The unit tests need
  # nothing but a shell and run here.
  cargoTestFlags = [ "--lib" ];

  meta = {
    description = "PID 1 that keeps an app's state in an S3 bucket, encrypted by rclone crypt";
    license = lib.licenses.asl20;
    mainProgram = "cvm-init";
    platforms = lib.platforms.linux;
  };
}
