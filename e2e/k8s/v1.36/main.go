// Command tessera-k8s is a multi-call binary (hyperkube style) holding the
// four upstream control-plane components the e2e suite runs, and the kubelet
// of its real node.
//
// One binary instead of five because the link step of each of these is the
// most expensive single step of a warm build on a 2-core CI machine, and they
// share almost all of their packages.
//
// Usage: tessera-k8s <component> [flags...]   or call it through a symlink
// named after the component (argv[0] dispatch).
//
// This file is the template: e2e/scripts/pin-k8s.sh copies it into every
// version module, so edit it here.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

var components = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
	"kubelet":                 newKubeletCommand,
}

// newKubeletCommand bridges a signature change: the constructor takes a
// context from 1.32 on and nothing before, and this template serves both.
func newKubeletCommand() *cobra.Command {
	switch newCommand := any(kubelet.NewKubeletCommand).(type) {
	case func(context.Context) *cobra.Command:
		return newCommand(context.Background())
	case func() *cobra.Command:
		return newCommand()
	default:
		panic(fmt.Sprintf("tessera-k8s: unexpected kubelet constructor %T", newCommand))
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: tessera-k8s {etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet} [flags...]")
	os.Exit(2)
}

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name != "etcd" && components[name] == nil {
		if len(args) == 0 {
			usage()
		}
		name, args = args[0], args[1:]
	}
	if name == "etcd" {
		// etcdmain.Main expects a full argv, program name first.
		etcdmain.Main(append([]string{"etcd"}, args...))
		return
	}
	newCommand := components[name]
	if newCommand == nil {
		fmt.Fprintf(os.Stderr, "tessera-k8s: unknown component %q\n", name)
		usage()
	}
	command := newCommand()
	// cobra would otherwise parse os.Args[1:], which still holds the component name.
	command.SetArgs(args)
	os.Exit(cli.Run(command))
}
