module datahoard.io/bench/latproxy

go 1.22
