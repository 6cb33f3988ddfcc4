"""`appliance install`: Ansible playbooks, driven from Python by ansible-runner.

    settings.py    the install section of appliance.toml (hosts, SSH, role variables)
    inventory.py   reading it (or --inventory FILE) and the inventory it becomes
    runner.py      one run of playbooks/site.yml: its run directory, ansible-runner, the result
    progress.py    what ansible-runner's events say: per-host progress, the final table, failures
    parsers.py     nvidia-smi, nvidia-smi topo -m, lspci, lsblk --json, mokutil, ss, timedatectl
    preflight.py   what the parsed probes mean for a host, and the checks `doctor` reports
    storage.py     which disks become the model store, and which must never be touched
    bundle.py      the offline bundle: wheels, repository configuration, engine images

The parsers and checks are plain Python so that they are unit-tested on fixture outputs;
the playbooks call them through the filter plugin in playbooks/filter_plugins/.
"""
