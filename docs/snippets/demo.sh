dynsparse demo
