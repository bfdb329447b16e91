module github.com/waitstate/waitstate-go/contrib/grpc

go 1.24.0

require (
	github.com/stretchr/testify v1.12.1
	github.com/waitstate/waitstate-go v0.3.0
	go.uber.org/goleak v1.3.0
	google.golang.org/genproto/googleapis/rpc v0.0.0-20251202230838-ff82c1b0f217
	google.golang.org/grpc v1.79.0
	google.golang.org/protobuf v1.36.10
)

require (
	github.com/golang-jwt/jwt/v5 v5.3.1 // indirect
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/net v0.48.0 // indirect
	golang.org/x/sync v0.19.0 // indirect
	golang.org/x/sys v0.39.0 // indirect
	golang.org/x/text v0.32.0 // indirect
)

replace github.com/waitstate/waitstate-go => ../..
