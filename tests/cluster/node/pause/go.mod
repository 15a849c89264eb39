module imds-broker/tests/cluster/node/pause

go 1.26.0
