// kubeletwatcher runs the kubelet's own plugin-registration machinery on one directory, so a test
// can check that `datahoard csi-node --registration-dir` registers with the real thing and not
// just with our reading of it.
//
// What is the kubelet's (k8s.io/kubernetes v1.34.4, pkg/kubelet/pluginmanager, unchanged): the
// fsnotify watcher of the plugins_registry directory, the desired/actual state caches, and the
// reconciler with its operation executor, which dials the socket, calls GetInfo, picks the
// handler for the plugin type, validates, registers and calls NotifyRegistrationStatus, and
// deregisters when the socket goes away. What is not: the CSIPlugin handler below, which does
// what the kubelet's CSI handler (pkg/volume/csi RegistrationHandler) does up to writing the
// CSINode object: accept only a 1.x version, then call NodeGetInfo on the endpoint the plugin
// named (a failure there is a registration failure, as in the kubelet). With -reject MSG every
// registration fails with MSG, to see the plugin's reaction to a rejection.
//
// Output: one JSON object per line on stdout ({"event": "ready" | "validate" | "register" |
// "deregister", ...}); the machinery's own logs go to stderr.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/operationexecutor"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/pluginwatcher"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/reconciler"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

var (
	dir    = flag.String("dir", "", "the plugins_registry directory to watch")
	reject = flag.String("reject", "", "fail every registration with this error")
	out    = json.NewEncoder(os.Stdout)
	outMu  sync.Mutex
)

func emit(fields map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	_ = out.Encode(fields)
}

type csiHandler struct{}

// highest1x is the kubelet CSI handler's version rule: the highest supported 1.x version.
func highest1x(versions []string) (*version.Version, error) {
	var best *version.Version
	for _, v := range versions {
		parsed, err := version.ParseGeneric(v)
		if err != nil || parsed.Major() != 1 {
			continue
		}
		if best == nil || parsed.GreaterThan(best) {
			best = parsed
		}
	}
	if best == nil {
		return nil, fmt.Errorf("none of the CSI versions reported by this driver are supported: %v", versions)
	}
	return best, nil
}

func (csiHandler) ValidatePlugin(name, endpoint string, versions []string) error {
	_, err := highest1x(versions)
	emit(map[string]any{"event": "validate", "name": name, "endpoint": endpoint, "versions": versions, "error": errString(err)})
	return err
}

func (csiHandler) RegisterPlugin(name, endpoint string, versions []string, _ *time.Duration) error {
	if *reject != "" {
		emit(map[string]any{"event": "register", "name": name, "endpoint": endpoint, "error": *reject})
		return errors.New(*reject)
	}
	nodeID, err := nodeGetInfo(endpoint)
	emit(map[string]any{"event": "register", "name": name, "endpoint": endpoint, "node_id": nodeID, "error": errString(err)})
	return err
}

func (csiHandler) DeRegisterPlugin(name, endpoint string) {
	emit(map[string]any{"event": "deregister", "name": name, "endpoint": endpoint})
}

func nodeGetInfo(endpoint string) (string, error) {
	conn, err := grpc.NewClient("unix://"+endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := csi.NewNodeClient(conn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return "", fmt.Errorf("error during CSI NodeGetInfo() call: %w", err)
	}
	return resp.GetNodeId(), nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func main() {
	klog.InitFlags(nil)
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "kubeletwatcher: -dir is required")
		os.Exit(2)
	}
	dsw := cache.NewDesiredStateOfWorld()
	asw := cache.NewActualStateOfWorld()
	// The kubelet's loop period (pluginmanager.loopSleepDuration).
	rc := reconciler.NewReconciler(
		operationexecutor.NewOperationExecutor(operationexecutor.NewOperationGenerator(&record.FakeRecorder{})),
		time.Second, dsw, asw)
	rc.AddHandler(registerapi.CSIPlugin, csiHandler{})
	stop := make(chan struct{})
	if err := pluginwatcher.NewWatcher(*dir, dsw).Start(stop); err != nil {
		fmt.Fprintf(os.Stderr, "kubeletwatcher: %v\n", err)
		os.Exit(1)
	}
	go rc.Run(stop)
	emit(map[string]any{"event": "ready", "dir": *dir})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	close(stop)
}
