"""Where the code runs: processes and hosts, device-to-host copies, accelerator facts and topologies."""
