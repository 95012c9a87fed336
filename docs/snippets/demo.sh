cd "$(mktemp -d)"   # the demo writes runs/demo/ here
/usr/bin/time -f "wall time %e s" dynsparse demo --no-progress 2>&1 | grep -v "^INFO"
